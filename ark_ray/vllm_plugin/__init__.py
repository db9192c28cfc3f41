"""ARK-ASR inside vLLM, as a general plugin.

The `vllm.general_plugins` entry point `arkasr = "ark_ray.vllm_plugin:register"` makes every
vLLM process (API server, engine core, workers) call `register()`, so `vllm serve <dir>` and
`LLM(model=<dir>)` load an ARK-ASR checkpoint with no extra code:

    LLM(model=dir, limit_mm_per_prompt={"audio": 1}).generate(
        generation_prompt(processor, wave_16k), SamplingParams(temperature=0, max_tokens=128))
"""
from __future__ import annotations

#: `architectures` values that load as ARK-ASR: ours, and the real checkpoint's spelling. These are the
#: registry names (what config.json says); the class behind them is `ArkAsrVllmModel`, named apart
#: from the transformers model `ark_ray.model.ArkAsrForConditionalGeneration`.
ARCHITECTURES = ("ArkAsrForConditionalGeneration", "ArkasrForConditionalGeneration")


def register() -> None:
    """Teach transformers the `arkasr` config and vLLM the ARK-ASR architectures (idempotent).

    The class itself is registered, not its "module:Class" name: vLLM inspects a class registered
    by name in a fresh Python subprocess (to keep CUDA out of the caller), which re-imports vLLM
    and cost 21-25 s of every engine's first start on a node (bench/engine_startup.py, 2-core
    CPU). Importing the class initialises no CUDA, and every engine process imports it anyway.
    """
    import ark_ray.model  # noqa: F401  (registers model_type "arkasr" with AutoConfig)
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    missing = [arch for arch in ARCHITECTURES if arch not in known]
    if missing:
        from ark_ray.vllm_plugin.model import ArkAsrVllmModel

        for arch in missing:
            ModelRegistry.register_model(arch, ArkAsrVllmModel)


def generation_prompt(processor, wave) -> dict:
    """A vLLM prompt (TokensPrompt dict) for one 16 kHz clip of at most 30 s.

    One `<|audio|>` placeholder: the plugin's processor expands it to the clip's token count.
    """
    return {"prompt_token_ids": processor.prompt_ids(1), "multi_modal_data": {"audio": wave}}


__all__ = ["ARCHITECTURES", "register", "generation_prompt"]
