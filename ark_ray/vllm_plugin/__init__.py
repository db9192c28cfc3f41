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
_MODEL = "ark_ray.vllm_plugin.model:ArkAsrVllmModel"


def register() -> None:
    """Teach transformers the `arkasr` config and vLLM the ARK-ASR architectures (idempotent).

    The model class is registered lazily by name, so this stays cheap and CUDA-free.
    """
    import ark_ray.model  # noqa: F401  (registers model_type "arkasr" with AutoConfig)
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in known:
            ModelRegistry.register_model(arch, _MODEL)


def generation_prompt(processor, wave) -> dict:
    """A vLLM prompt (TokensPrompt dict) for one 16 kHz clip of at most 30 s.

    One `<|audio|>` placeholder: the plugin's processor expands it to the clip's token count.
    """
    return {"prompt_token_ids": processor.prompt_ids(1), "multi_modal_data": {"audio": wave}}


__all__ = ["ARCHITECTURES", "register", "generation_prompt"]
