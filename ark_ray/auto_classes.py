"""`import ark_ray` registers ARK-ASR with transformers' Auto classes, and stays light.

`ark_ray.model` registers model_type "arkasr" with AutoConfig, AutoModel and
AutoModelForCausalLM on import, but it needs torch and transformers (seconds to import), which
most of ark_ray does not (the config, evaluation, the jobs' drivers). So `import ark_ray` does the
registration the moment transformers is there: at once when transformers is already imported,
otherwise right after its first import (a one-shot hook on `sys.meta_path`). Hence

    import ark_ray
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ark_asr_dir)

loads ArkAsrForConditionalGeneration, while `import ark_ray` alone imports none of torch,
transformers, vLLM, Ray or DeepSpeed.
"""
from __future__ import annotations

import sys
import warnings

_TRIGGER = "transformers"


def register() -> None:
    """Register the Auto classes now (imports torch and transformers)."""
    try:
        import ark_ray.model  # noqa: F401  (its import registers "arkasr")
    except Exception as e:  # noqa: BLE001 - never break the user's `import transformers`
        warnings.warn(f"ARK-ASR is not registered with transformers' Auto classes: {e!r}", stacklevel=2)


class _AfterImport:
    """Finds nothing itself: on the first import of transformers it lets the other finders find it,
    then makes the loader call `register()` once transformers' own module code has run (a
    meta path finder by protocol: subclassing importlib.abc would cost more than the rest)."""

    def find_spec(self, name, path=None, target=None):
        if name != _TRIGGER:
            return None
        import importlib.util

        if self in sys.meta_path:
            sys.meta_path.remove(self)   # one shot, and out of the way of the search below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register   # this spec's own loader instance
        return spec


def install() -> None:
    """Register now if transformers is loaded, else once it is (idempotent)."""
    if _TRIGGER in sys.modules:
        register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
