"""Generation of every Show-o method through the CLI, shared by the Show-o chain tests (one chain per tokenizer)."""

import json
from pathlib import Path

from arrag.cli import main


def generate_every_method(world: Path, out: Path, index: str, faid: Path, *options: str
                          ) -> dict[str, tuple[dict, list[Path]]]:
    """showo, showo_daid (lambda 1) and showo_faid (weights `faid`) of the Show-o in world/showo on the prompts of
    world/meta_data.json, with `options` added -> {method: (generation record, its PNG files sorted)}."""
    generated = {}
    for method, variant, extra in (("showo", "default", []), ("showo_daid", "lam1.0_tau1.0", ["--index", index]),
                                   ("showo_faid", "default", ["--index", index, "--weights", str(faid)])):
        images = out / method / "images"
        assert main(["generate", "--benchmark", "mjhq", "--prompts", str(world / "meta_data.json"), "--method",
                     method, "--variant", variant, "--backbone", str(world / "showo"), "--device", "cpu",
                     "--micro-batch", "2", "--maskgit-steps", "4", "--guidance-scale", "2", "--daid-k", "4",
                     "--images", str(images), "--record", str(out / method / "record.json"), *options, *extra]) == 0
        generated[method] = (json.loads((out / method / "record.json").read_text()), sorted(images.rglob("*.png")))
    return generated
