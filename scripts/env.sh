# Environment shared by the jobs and the tests on CPU machines (sourced, not run).
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# no VLLM_CPU_KVCACHE_SPACE: each CPU engine sizes its own KV cache (ark_ray/engines/cpu_memory.py)
export TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_USAGE_STATS_ENABLED=0
