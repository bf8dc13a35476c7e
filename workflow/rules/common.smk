# Shared definitions: config validation, paths, and the list of targets per stage.
import importlib.util
import os
import shlex

from arrag.cli import COMMANDS
from arrag.config import ConfigError, config_hash, validate

try:
    validate(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

# Jobs import this repository's packages whatever environment runs them (pip install or --use-conda).
shell.prefix("set -euo pipefail; export PYTHONPATH=" + shlex.quote(workflow.basedir) + "${{PYTHONPATH:+:$PYTHONPATH}}; ")
MAIN_ENV = "../envs/main.yaml"  # relative to the rule files
GENEVAL_ENV = "../envs/geneval.yaml" if config["evaluation"]["geneval_backend"] == "mmdet" else MAIN_ENV
DPG_ENV = "../envs/dpg.yaml" if config["evaluation"]["dpg_backend"] == "mplug" else MAIN_ENV

RUN = config["run_name"]
R = f"results/{RUN}"
LOGS = f"logs/{RUN}"
SHAPES = config["scale"] == "shapes"
CONFIG_HASH = config_hash(config)
BENCHMARKS = ["geneval", "dpg", "mjhq"]
INDEX_SHARDS = list(range(config["index"]["shards"]))


wildcard_constraints:
    split="database|train|heldout",
    bench="geneval|dpg|mjhq|mjhq_ablation",
    method="vanilla|racm3|daid|faid",
    shard=r"\d+",


# ---------------------------------------------------------------- inputs of each scale
if SHAPES:
    BENCHMARK_DIR = f"{R}/benchmarks"
    GENEVAL_METADATA = f"{BENCHMARK_DIR}/geneval/evaluation_metadata.jsonl"
    DPG_PROMPTS = f"{BENCHMARK_DIR}/dpg_bench/prompts"
    DPG_QUESTIONS = f"{BENCHMARK_DIR}/dpg_bench/dpg_bench.csv"
    MJHQ_META = f"{BENCHMARK_DIR}/mjhq/meta_data.json"
    MJHQ_IMAGES = f"{BENCHMARK_DIR}/mjhq/images"
    BACKBONE = f"{R}/models/backbone"
    DATABASE_IMAGES = f"{R}/shapes/database"
    FINETUNE_IMAGES = f"{R}/shapes/train"
else:
    BENCHMARK_DIR = "resources/benchmarks"
    GENEVAL_METADATA = config["benchmarks"]["geneval"]["metadata"]
    DPG_PROMPTS = config["benchmarks"]["dpg"]["prompts"]
    DPG_QUESTIONS = config["benchmarks"]["dpg"]["questions"]
    MJHQ_META = config["benchmarks"]["mjhq"]["meta"]
    MJHQ_IMAGES = config["benchmarks"]["mjhq"]["images"]
    BACKBONE = "resources/models/backbone"
    DATABASE_IMAGES = "resources/datasets/database"
    FINETUNE_IMAGES = "resources/datasets/finetune"


def benchmark_files(wildcards=None):
    """The benchmark files every generation and scoring rule reads, by name (for `unpack`)."""
    if SHAPES:
        return {"benchmarks": BENCHMARK_DIR}
    return {"geneval_metadata": GENEVAL_METADATA, "dpg_prompts": DPG_PROMPTS, "dpg_questions": DPG_QUESTIONS,
            "mjhq_meta": MJHQ_META, "mjhq_images": MJHQ_IMAGES}


def benchmark_path(name):
    """A benchmark file as a function of a job's input (Shapes: inside the benchmark folder)."""
    inside = {"geneval_metadata": GENEVAL_METADATA, "dpg_prompts": DPG_PROMPTS, "dpg_questions": DPG_QUESTIONS,
              "mjhq_meta": MJHQ_META, "mjhq_images": MJHQ_IMAGES}[name]
    if SHAPES:
        return lambda wildcards, input: os.path.join(input.benchmarks, os.path.relpath(inside, BENCHMARK_DIR))
    return lambda wildcards, input: input[name]


def prompt_source(wildcards, input):
    """The prompt file (GenEval, MJHQ) or folder (DPG-Bench) of a generation job."""
    name = {"geneval": "geneval_metadata", "dpg": "dpg_prompts"}.get(wildcards.bench, "mjhq_meta")
    return benchmark_path(name)(wildcards, input)


# ---------------------------------------------------------------- variants
def daid_variants():
    grid = config["daid"]["grid"]
    return [f"lam{lam}_tau{tau}" for lam in grid["lam"] for tau in grid["tau"]]


def faid_variants():
    grid = config["faid"]["grid"]
    return [f"hops{hops}_m{m}" for hops in grid["hops"] for m in grid["m"]]


def main_variant(method):
    """vanilla and RA-CM3 have one setting; DAiD and FAiD use the values selected from their ablation."""
    return "default" if method in ("vanilla", "racm3") else "selected"


# ---------------------------------------------------------------- inputs of generation and scoring
def method_inputs(wildcards):
    """Extra inputs of a method: the index, fine-tuned weights, or the selected ablation values."""
    method, variant = wildcards.method, wildcards.variant
    inputs = {}
    if method in ("daid", "faid"):
        inputs["index"] = f"{R}/index/index.faiss"
    if method == "faid" and variant != "selected":
        inputs["weights"] = f"{R}/models/faid/{variant}"
    if method in ("daid", "faid") and variant == "selected":
        inputs["selection"] = f"{R}/selection/{method}.json"
    if method == "racm3":
        inputs["weights"] = f"{R}/models/racm3"
        inputs["clip_index"] = f"{R}/racm3/clip_index"
    return inputs


def generated(wildcards):
    return f"{R}/generated/{wildcards.bench}/{wildcards.method}/{wildcards.variant}/record.json"


def generated_images(wildcards):
    return f"{R}/generated/{wildcards.bench}/{wildcards.method}/{wildcards.variant}/images"


def cmmd_model_args():
    """CMMD's CLIP: the Shapes CLIP trained in the DAG, or an open_clip model name and pretrained tag."""
    if config["evaluation"]["cmmd_model"] == "shapes":
        return {"clip": f"{R}/models/clip"}
    return {}


# ---------------------------------------------------------------- stages and their targets
def implemented(name):
    """An `arrag` subcommand with an implementation, or an evaluator module ('eval:<name>')."""
    if name.startswith("eval:"):
        return importlib.util.find_spec(f"evaluators.{name[5:]}") is not None
    return COMMANDS[name][0] is not None


BACKBONE_COMMANDS = ["train-vq", "train-lm"] if SHAPES else ["fetch"]
DATA_COMMANDS = ["shapes-world", "shapes-benchmarks"] if SHAPES else ["fetch"]
INDEX_COMMANDS = BACKBONE_COMMANDS + ["encode-patches", "train-index", "add-shard", "merge-index"]
METHOD_COMMANDS = {
    "vanilla": BACKBONE_COMMANDS + ["generate"],
    "daid": INDEX_COMMANDS + ["generate", "select", "eval:fid"],
    "faid": INDEX_COMMANDS + ["precompute-retrievals", "finetune-faid", "generate", "select", "eval:fid"],
    "racm3": BACKBONE_COMMANDS + (["train-clip"] if SHAPES else [])
    + ["build-clip-index", "finetune-racm3", "generate"],
}
METRIC_FILES = {"geneval": ["geneval"], "dpg": ["dpg"], "mjhq": ["fid", "cmmd", "fwd"]}
METRICS = tuple(f"{m}:" for metrics in METRIC_FILES.values() for m in metrics)


def metric_commands(metric):
    clip = ["train-clip"] if SHAPES and metric == "cmmd" else []
    return clip + [f"eval:{metric}"]


def stage_targets():
    """[(stage, commands it needs, target files)] for the whole pipeline, in order."""
    stages = []
    if SHAPES:
        stages.append(("Shapes world", ["shapes-world"], expand(f"{R}/shapes/{{split}}", split=["database", "train", "heldout"])))
        stages.append(("Shapes benchmarks", DATA_COMMANDS, [BENCHMARK_DIR]))
        stages.append(("Shapes VQ", ["shapes-world", "train-vq"], [f"{R}/models/vq"]))
        stages.append(("Shapes CLIP", ["train-clip"], [f"{R}/models/clip"]))
    else:
        stages.append(("data acquisition", DATA_COMMANDS, list(benchmark_files().values())))
    stages.append(("backbone", BACKBONE_COMMANDS, [BACKBONE]))
    stages.append(("patch index", INDEX_COMMANDS, [f"{R}/index/index.faiss"]))
    stages.append(("retrieval analysis", INDEX_COMMANDS + ["retrieval-analysis"],
                   [f"{R}/analysis/retrieval_accuracy.csv"]))
    for method in config["methods"]:
        variant = main_variant(method)
        stages.append((f"generation: {method}", DATA_COMMANDS + METHOD_COMMANDS[method],
                       [f"{R}/generated/{bench}/{method}/{variant}/record.json" for bench in BENCHMARKS]))
        for bench, metrics in METRIC_FILES.items():
            for metric in metrics:
                stages.append((f"{metric}: {method}", DATA_COMMANDS + METHOD_COMMANDS[method] + metric_commands(metric),
                               [f"{R}/metrics/{bench}/{method}/{variant}/{metric}.json"]))
    stages.append(("tables", ["tables"], [f"{R}/tables/README.md"]))
    return stages


def table_inputs():
    """The generation and metric records the tables are rendered from."""
    return [t for stage, _, targets in stage_targets() if stage.startswith(("generation:", *METRICS))
            for t in targets]


def ready_targets():
    return [t for _, commands, targets in stage_targets() if all(map(implemented, commands)) for t in targets]


def all_targets():
    return [t for _, _, targets in stage_targets() for t in targets]


def missing_stages():
    return [(stage, [c for c in commands if not implemented(c)]) for stage, commands, _ in stage_targets()
            if not all(map(implemented, commands))]


onstart:
    missing = missing_stages()
    if missing:
        print(f"[arrag] {len(missing)} stage(s) not implemented yet, left out of `all` "
              "(request them by file or with `everything` to see them fail):")
        for stage, commands in missing:
            print(f"[arrag]   {stage}: needs {', '.join(commands)}")
