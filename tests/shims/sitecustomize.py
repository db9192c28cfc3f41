"""CPU test shim (on PYTHONPATH only for the vLLM Qwen3-ASR parity subprocess).

vLLM's Qwen3-ASR module imports Qwen-VL code that does
`from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize`; that module imports
torchvision, which this CPU machine cannot have (PyPI's torchvision builds do not load beside the
CPU torch; scripts/setup.sh removes them). No image is ever processed for audio, so where
torchvision is missing that module name is served by transformers' own torchvision-free PIL
variant (same `smart_resize`). The GPU image has torchvision and never takes this path.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys

if importlib.util.find_spec("torchvision") is None:
    class _PilQwen2VL(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"

        def find_spec(self, fullname, path, target=None):
            return importlib.machinery.ModuleSpec(fullname, self) if fullname == self.name else None

        def create_module(self, spec):
            mod = importlib.import_module("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
            mod.Qwen2VLImageProcessor = getattr(mod, "Qwen2VLImageProcessor", mod.Qwen2VLImageProcessorPil)
            return mod

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _PilQwen2VL())
