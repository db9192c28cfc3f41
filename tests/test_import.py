"""`import ark_ray` registers ARK-ASR with transformers' Auto classes, without importing the heavy
stacks itself (ark_ray/auto_classes.py). Each case runs in a fresh interpreter: what a user types."""
from __future__ import annotations

import json
import subprocess
import sys


HEAVY = ("torch", "transformers", "vllm", "ray", "deepspeed")


def _python(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_ark_ray_loads_no_heavy_stack():
    loaded = _python(f"import sys, json, ark_ray; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert loaded == []


LOAD = """
import json
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
d = {d!r}
m, base = AutoModelForCausalLM.from_pretrained(d), AutoModel.from_pretrained(d)
print(json.dumps([type(m).__module__ + "." + type(m).__name__, type(base).__name__,
                  AutoConfig.from_pretrained(d).model_type, sum(p.numel() for p in m.parameters())]))
"""


def test_auto_classes_load_a_checkpoint_after_import_ark_ray(repo_root):
    """`import ark_ray` before transformers and after it: two fresh interpreters, run side by side."""
    d = str(repo_root / "assets" / "models" / "teacher")
    firsts = {"ark_ray first": "import ark_ray\n", "transformers first": "import transformers\nimport ark_ray\n"}
    procs = {order: subprocess.Popen([sys.executable, "-c", first + LOAD.format(d=d)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for order, first in firsts.items()}
    from ark_ray.model import ArkAsrForConditionalGeneration

    want = ArkAsrForConditionalGeneration.from_pretrained(d)
    for order, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (order, err[-3000:])
        got = json.loads(out.strip().splitlines()[-1])
        assert got == ["ark_ray.model.modeling.ArkAsrForConditionalGeneration", "ArkAsrForConditionalGeneration",
                       "arkasr", sum(p.numel() for p in want.parameters())], order


# Lower layers never import upper ones: each top-level part of the package may import only parts
# of a lower or equal rank (docs/architecture.md, "Layers"). A new top-level module or package gets
# its rank here.
LAYERS = {"config": 0, "cli": 0, "net": 0, "metrics": 0, "console": 0, "faults": 0,
          "auto_classes": 2, "ark_ray": 2,   # the package's __init__
          "audio": 1, "eval": 1, "model": 2, "vllm_plugin": 3, "engines": 4, "runtime": 5,
          "data": 6, "demo": 6, "train": 7, "opd": 8, "serve": 8}


def test_lower_layers_never_import_upper_ones(repo_root):
    import ast

    wrong, unplaced = [], set()
    for path in sorted((repo_root / "ark_ray").rglob("*.py")):
        rel = path.relative_to(repo_root / "ark_ray").parts
        part = rel[0].removesuffix(".py") if len(rel) > 1 or rel[0] != "__init__.py" else "ark_ray"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ark_ray":   # from ark_ray import metrics
                names = [f"ark_ray.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name != "ark_ray" and not name.startswith("ark_ray."):
                    continue
                target = name.split(".")[1] if "." in name else "ark_ray"
                for p in (part, target):
                    if p not in LAYERS:
                        unplaced.add(p)
                if part in LAYERS and target in LAYERS and LAYERS[target] > LAYERS[part]:
                    wrong.append(f"{path.relative_to(repo_root)} imports {name}")
    assert sorted(unplaced) == [], "give these parts of ark_ray a rank in LAYERS"
    assert wrong == []
    assert LAYERS["engines"] < LAYERS["train"] < LAYERS["opd"]        # the test can tell the order
