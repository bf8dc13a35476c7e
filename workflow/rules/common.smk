# Shared definitions: config validation, paths, and the list of targets per stage.
import os
import shlex
import sys

# This workflow's own packages, also where another copy of them is installed: the jobs run them (PYTHONPATH below),
# and the rules' code hashes (arrag.codehash) must be of the same files.
sys.path.insert(0, workflow.basedir)

from arrag.codehash import code_hash
from arrag.config import ConfigError, config_hash, validate
from arrag.tables import OUTPUTS as TABLE_OUTPUTS, TABLES

try:
    validate(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

# Jobs import this repository's packages whatever environment runs them (pip install or --use-conda).
# Every rule's command starts with OMP_NUM_THREADS={threads}: a job's numerical libraries use the cores
# Snakemake gave it, never more (two torch jobs with two threads each on two cores slow each other down
# many times over).
# Every result record names the config it was made under (provenance, like its git commit): the evaluators read
# ARRAG_CONFIG_HASH. It is no rule's param, so that a rule reruns when something it depends on changes (its params,
# inputs and code), not on any edit of the config.
shell.prefix(
    "set -euo pipefail; export PYTHONPATH="
    + shlex.quote(workflow.basedir)
    + "${{PYTHONPATH:+:$PYTHONPATH}}; export ARRAG_CONFIG_HASH="
    + config_hash(config)
    + "; "
)
MAIN_ENV = "../envs/main.yaml"  # relative to the rule files
GENEVAL_ENV = (
    "../envs/geneval.yaml"
    if config["evaluation"]["geneval_backend"] == "mmdet"
    else MAIN_ENV
)
DPG_ENV = (
    "../envs/dpg.yaml" if config["evaluation"]["dpg_backend"] == "mplug" else MAIN_ENV
)

RUN = config["run_name"]
R = f"results/{RUN}"
# The patch index and its sidecars (fingerprint, values; the on-disk inverted lists of an ivfpq index merged
# with `ondisk`): `tokens` indexes are numpy archives, the others FAISS files.
INDEX_SUFFIX = "tokens" if config["index"]["type"] == "tokens" else "faiss"
INDEX_FILE = f"{R}/index/index.{INDEX_SUFFIX}"
INDEX_SIDECARS = [f"{INDEX_FILE}.json", f"{INDEX_FILE}.values.npz"] + (
    [f"{INDEX_FILE}.ivfdata"]
    if config["index"]["ondisk"] and config["index"]["type"] == "ivfpq"
    else []
)
SHOWO_INDEX = f"{R}/index_showo/index.tokens"
SHOWO_INDEX_SIDECARS = [f"{SHOWO_INDEX}.json", f"{SHOWO_INDEX}.values.npz"]
LOGS = f"logs/{RUN}"
SHAPES = config["scale"] == "shapes"
BENCHMARKS = ["geneval", "dpg", "mjhq"]
INDEX_SHARDS = list(range(config["index"]["shards"]))
# Threads of a generation or metric job. In the Shapes world such a job spends most of its time in single-threaded
# work (imports, the decode loop's per-step dispatch of a tiny model, PIL resizing), so two one-thread jobs side by
# side finish sooner than the same jobs one after the other with two threads each; training jobs keep two.
EVAL_THREADS = 1 if SHAPES else 2
# Models, index and fine-tunes (the long chains) start before generation and metric jobs that are ready, so that
# no method's chain is left to finish alone at the end of the run while the other core idles.
CHAIN_PRIORITY = 10
# The longest chain of all (tokenizer -> training tokens -> backbone -> fine-tunes -> generation) starts first, before
# the CLIP's, so that its tail is not what the run ends waiting for.
LONGEST_CHAIN_PRIORITY = CHAIN_PRIORITY + 1
FINETUNE_GPUS = 0 if SHAPES else config["finetune_gpus"]
# The fine-tuning CLI, under torchrun (one process per GPU, gradients summed) when a job has several GPUs.
FINETUNE_LAUNCH = (
    ["python", "-m", "arrag.cli"]
    if FINETUNE_GPUS <= 1
    else [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        str(FINETUNE_GPUS),
        "-m",
        "arrag.cli",
    ]
)


wildcard_constraints:
    split="database|train|heldout",
    bench="geneval|dpg|mjhq|mjhq_ablation",
    method="vanilla|racm3|daid|faid|showo|showo_daid|showo_faid",
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
    TOKENIZER = f"{R}/models/vq"  # the backbone's VQ: the same weights (the LM trains with it frozen)
    # Show-o: trained in the DAG over the Shapes VQ, which its folder holds; its O index is redefined from the main
    # index's shards (same tokens), and its fine-tuning reads the main split tokens.
    SHOWO_MODEL = f"{R}/models/showo"
    SHOWO_TOKENIZERS = {}
else:
    BENCHMARK_DIR = "resources/benchmarks"
    GENEVAL_METADATA = config["benchmarks"]["geneval"]["metadata"]
    DPG_PROMPTS = config["benchmarks"]["dpg"]["prompts"]
    DPG_QUESTIONS = config["benchmarks"]["dpg"]["questions"]
    MJHQ_META = config["benchmarks"]["mjhq"]["meta"]
    MJHQ_IMAGES = config["benchmarks"]["mjhq"]["images"]
    BACKBONE = "resources/models/backbone"
    DATABASE_IMAGES = "resources/datasets/database"
    FINETUNE_IMAGES = f"{R}/finetune"  # built from the fetched fine-tuning datasets (data.smk: finetune_split)
    TOKENIZER = BACKBONE
    # Show-o: the hub checkpoint, its MAGVIT-v2 image tokenizer and Phi-1.5's text tokenizer, fetched; its O index
    # and its fine-tuning tokens are MAGVIT-v2 tokens of the database and fine-tuning images.
    SHOWO_MODEL = "resources/models/showo"
    SHOWO_TOKENIZERS = {
        "tokenizer": "resources/models/showo_tokenizer",
        "text_tokenizer": "resources/models/showo_text_tokenizer",
    }
# VQ tokens of the training / fine-tuning images (Shapes: the train split is both), read by every job training on them.
SPLIT_TOKENS = f"{R}/tokens/finetune.npz"
SHOWO_SHARDS = expand(
    f"{R}/index{'' if SHAPES else '_showo'}/shards/{{shard}}.npz", shard=INDEX_SHARDS
)
SHOWO_TOKENS = SPLIT_TOKENS if SHAPES else f"{R}/tokens/finetune_showo.npz"


def benchmark_files(wildcards=None):
    """The benchmark files every generation and scoring rule reads, by name (for `unpack`)."""
    if SHAPES:
        return {"benchmarks": BENCHMARK_DIR}
    return {
        "geneval_metadata": GENEVAL_METADATA,
        "dpg_prompts": DPG_PROMPTS,
        "dpg_questions": DPG_QUESTIONS,
        "mjhq_meta": MJHQ_META,
        "mjhq_images": MJHQ_IMAGES,
    }


def benchmark_path(name):
    """A benchmark file as a function of a job's input (Shapes: inside the benchmark folder)."""
    inside = {
        "geneval_metadata": GENEVAL_METADATA,
        "dpg_prompts": DPG_PROMPTS,
        "dpg_questions": DPG_QUESTIONS,
        "mjhq_meta": MJHQ_META,
        "mjhq_images": MJHQ_IMAGES,
    }[name]
    if SHAPES:
        return lambda wildcards, input: os.path.join(
            input.benchmarks, os.path.relpath(inside, BENCHMARK_DIR)
        )
    return lambda wildcards, input: input[name]


def prompt_source(wildcards, input):
    """The prompt file (GenEval, MJHQ) or folder (DPG-Bench) of a generation job."""
    name = {"geneval": "geneval_metadata", "dpg": "dpg_prompts"}.get(
        wildcards.bench, "mjhq_meta"
    )
    return benchmark_path(name)(wildcards, input)


# ---------------------------------------------------------------- variants
def daid_variants():
    grid = config["daid"]["grid"]
    return [f"lam{lam}_tau{tau}" for lam in grid["lam"] for tau in grid["tau"]]


def faid_variants():
    grid = config["faid"]["grid"]
    return [f"hops{hops}_m{m}" for hops in grid["hops"] for m in grid["m"]]


def pinned_values(method):
    """`--pin` arguments of `arrag select` for values the config fixes (all of a method's, or none)."""
    names = {"daid": ("lam", "tau"), "faid": ("hops", "m")}[method]
    values = [config[method][name] for name in names]
    if any(v is None for v in values):
        return []
    return [
        a for name, value in zip(names, values) for a in ("--pin", f"{name}{value}")
    ]


def faid_weight_variants(variant):
    """The FAiD fine-tunes a generation needs: its own cell, or for 'selected' every cell it may select (the
    pinned one when the config pins hops and m, else the whole grid)."""
    if variant != "selected":
        return [variant]
    if pinned_values("faid"):
        return [f"hops{config['faid']['hops']}_m{config['faid']['m']}"]
    return faid_variants()


def finetune_arguments(settings):
    """A `finetune` config block as command-line arguments of the shared fine-tuning loop (a list)."""
    return [
        a
        for key, value in settings.items()
        for a in (f"--{key.replace('_', '-')}", str(value))
    ]


def main_variant(method):
    """vanilla, RA-CM3 and Show-o have one setting; DAiD and FAiD use the values selected from their ablation;
    DAiD on Show-o the values of the config (no ablation on Show-o)."""
    if method == "showo_daid":
        return (
            f"lam{config['showo']['daid']['lam']}_tau{config['showo']['daid']['tau']}"
        )
    return "selected" if method in ("daid", "faid") else "default"


def generation_backbone(wildcards):
    """The backbone folder (or hub id) a generation job loads: Show-o for the showo* methods."""
    return SHOWO_MODEL if wildcards.method.startswith("showo") else BACKBONE


# ---------------------------------------------------------------- inputs of generation and scoring
def method_inputs(wildcards):
    """Extra inputs of a method: the index, fine-tuned weights, or the selected ablation values."""
    method, variant = wildcards.method, wildcards.variant
    inputs = {}
    if method in ("daid", "faid"):
        inputs["index"] = INDEX_FILE
    if method == "faid":
        inputs["weights"] = [
            f"{R}/models/faid/{v}" for v in faid_weight_variants(variant)
        ]
    if method in ("daid", "faid") and variant == "selected":
        inputs["selection"] = f"{R}/selection/{method}.json"
    if method == "racm3":
        inputs["weights"] = f"{R}/models/racm3"
        inputs["clip_index"] = f"{R}/racm3/clip_index"
    if method in ("showo_daid", "showo_faid"):
        inputs["index"] = SHOWO_INDEX
    if method == "showo_faid":
        inputs["weights"] = f"{R}/models/showo_faid"
    if method.startswith("showo"):
        inputs.update(SHOWO_TOKENIZERS)
    return inputs


def index_sidecars(wildcards):
    """The files the CLI reads beside a method's --index (fingerprint, values, on-disk lists); none without one."""
    index = method_inputs(wildcards).get("index")
    return {INDEX_FILE: INDEX_SIDECARS, SHOWO_INDEX: SHOWO_INDEX_SIDECARS}.get(
        index, []
    )


def sampling_arguments(wildcards):
    """`arrag generate`'s sampling options of the job's backbone and method (Janus: CFG, top-k / top-p; Show-o:
    guidance and decoding steps). A function of the wildcards only, never of the input: Snakemake compares a param
    derived from the input by the input files alone, so a setting placed there would not rerun the job when it
    changes. Each backbone gets only its own settings, so a change of one reruns that backbone's generations.
    """
    if wildcards.method.startswith("showo"):
        sampling = config["showo"]["sampling"]
        return [
            "--guidance-scale",
            str(sampling["guidance_scale"]),
            "--maskgit-steps",
            str(sampling["steps"]),
        ]
    sampling = config["sampling"]
    arguments = [
        "--cfg-weight",
        str(sampling["cfg_weight"]),
        "--top-k",
        str(sampling["top_k"] or 0),
        "--top-p",
        str(sampling["top_p"] or 1.0),
    ]
    if wildcards.method == "faid" and config["faid"]["blend_unconditional"]:
        arguments.append("--blend-unconditional")
    return arguments


def method_arguments(wildcards, input):
    """`arrag generate` arguments for a method's input files (a list; lists of files follow their option)."""
    arguments = []
    for key in method_inputs(wildcards):
        files = input[key]
        arguments += [
            f"--{key.replace('_', '-')}",
            *([files] if isinstance(files, str) else files),
        ]
    return arguments


def generated(wildcards):
    return f"{R}/generated/{wildcards.bench}/{wildcards.method}/{wildcards.variant}/record.json"


def generated_images(wildcards):
    return (
        f"{R}/generated/{wildcards.bench}/{wildcards.method}/{wildcards.variant}/images"
    )


SHAPES_CLIP = f"{R}/models/clip"


def cmmd_model_args():
    """CMMD's CLIP: the Shapes CLIP trained in the DAG, or an open_clip model name and pretrained tag."""
    if config["evaluation"]["cmmd_model"] == "shapes":
        return {"clip": SHAPES_CLIP}
    return {}


def fwd_args():
    """FWD's wavelet, level and resize from the config's evaluation block."""
    evaluation = config["evaluation"]
    resize = evaluation["fwd_resize"]
    return [
        "--wavelet",
        evaluation["fwd_wavelet"],
        "--level",
        str(evaluation["fwd_level"]),
    ] + (["--resize", str(resize)] if resize else [])


def open_clip_args(model, pretrained):
    """How CMMD and build-clip-index load a CLIP (`--model`, `--pretrained`, `--model-config`): 'shapes' is the
    Shapes CLIP trained in the DAG, anything else an open_clip name with its pretrained tag or file.
    """
    if model == "shapes":
        return [
            "--model-config",
            f"{SHAPES_CLIP}/shapes_clip.json",
            "--pretrained",
            f"{SHAPES_CLIP}/open_clip_model.safetensors",
        ]
    return ["--model", model] + (["--pretrained", pretrained] if pretrained else [])


def geneval_backend_args():
    """Extra arguments of `python -m evaluators geneval` for the configured detector backend."""
    settings = config["evaluation"]
    args = ["--backend", settings["geneval_backend"]]
    if settings["geneval_backend"] == "mmdet":
        args += [
            "--mmdet-checkpoint",
            settings["geneval_detector_checkpoint"] or "",
            "--object-names",
            os.path.join(os.path.dirname(GENEVAL_METADATA), "object_names.txt"),
        ]
    else:
        args += ["--vocabulary", f"{BENCHMARK_DIR}/vocabulary.json"]
    if (
        settings["geneval_clip_model"] == "shapes"
    ):  # open_clip's local-dir: reads the folder's config and weights
        args += [
            "--clip-model",
            f"local-dir:{SHAPES_CLIP}",
            "--clip-pretrained",
            f"{SHAPES_CLIP}/open_clip_model.safetensors",
        ]
        return args
    for key in ("clip_model", "clip_pretrained"):
        if settings[f"geneval_{key}"]:
            args += [f"--{key.replace('_', '-')}", settings[f"geneval_{key}"]]
    return args


def dpg_backend_args():
    """Extra arguments of `python -m evaluators dpg` for the configured VQA backend."""
    settings = config["evaluation"]
    args = ["--backend", settings["dpg_backend"]]
    if settings["dpg_backend"] == "shapes":
        args += ["--vocabulary", f"{BENCHMARK_DIR}/vocabulary.json"]
    if settings["dpg_vqa_model"]:
        args += ["--vqa-model", settings["dpg_vqa_model"]]
    if settings["dpg_official_quirks"]:
        args.append("--official-quirks")
    return args


# ---------------------------------------------------------------- stages and their targets
METRIC_FILES = {"geneval": ["geneval"], "dpg": ["dpg"], "mjhq": ["fid", "cmmd", "fwd"]}
METRICS = tuple(f"{m}:" for metrics in METRIC_FILES.values() for m in metrics)


def stage_targets():
    """[(stage, target files)] for the whole pipeline, in order."""
    stages = []
    if SHAPES:
        stages.append(
            (
                "Shapes world",
                expand(f"{R}/shapes/{{split}}", split=["database", "train", "heldout"]),
            )
        )
        stages.append(("Shapes benchmarks", [BENCHMARK_DIR]))
        stages.append(("Shapes VQ", [f"{R}/models/vq"]))
        stages.append(("Shapes CLIP", [f"{R}/models/clip"]))
        stages.append(
            (
                "evaluator checks",
                [f"{R}/checks/detector_clean.json", f"{R}/checks/dpg_vqa_truth.json"],
            )
        )
        stages.append(
            ("evaluator checks on VQ reconstructions", [f"{R}/checks/detector_vq.json"])
        )
    else:
        stages.append(("data acquisition", list(benchmark_files().values())))
    stages.append(("backbone", [BACKBONE]))
    stages.append(("patch index", [INDEX_FILE]))
    stages.append(("retrieval analysis", [f"{R}/analysis/retrieval_accuracy.csv"]))
    for method in config["methods"]:
        variant = main_variant(method)
        stages.append(
            (
                f"generation: {method}",
                [
                    f"{R}/generated/{bench}/{method}/{variant}/record.json"
                    for bench in BENCHMARKS
                ],
            )
        )
        for bench, metrics in METRIC_FILES.items():
            for metric in metrics:
                stages.append(
                    (
                        f"{metric}: {method}",
                        [f"{R}/metrics/{bench}/{method}/{variant}/{metric}.json"],
                    )
                )
    for method in config["showo"]["methods"]:  # Table 3 only: the MJHQ-style benchmark
        variant = main_variant(method)
        stages.append(
            (
                f"generation: {method}",
                [f"{R}/generated/mjhq/{method}/{variant}/record.json"],
            )
        )
        for metric in METRIC_FILES["mjhq"]:
            stages.append(
                (
                    f"{metric}: {method}",
                    [f"{R}/metrics/mjhq/{method}/{variant}/{metric}.json"],
                )
            )
    stages.append(("tables", [f"{R}/tables/README.md"]))
    return stages


def table_inputs():
    """The generation and metric records the tables are rendered from."""
    return [
        t
        for stage, targets in stage_targets()
        if stage.startswith(("generation:", *METRICS))
        for t in targets
    ]


def all_targets():
    return [t for _, targets in stage_targets() for t in targets]


# ---------------------------------------------------------------- data acquisition (paper scale) and report
def fetched_file(folder, entry):
    """An output of a benchmark's fetch rule: a file, or a folder (directory output)."""
    path = f"{folder}/{entry['to']}"
    return directory(path) if entry["folder"] else path


REPORTED = os.path.join(
    workflow.basedir, "results", "reported"
)  # the paper's numbers, committed
TABLE_TITLES = {f"{t.name}.csv": t.title for t in TABLES}


def report_inputs():
    """The records of the tables, and the ablation FIDs of Figure 7."""
    inputs = table_inputs()
    for method, variants in (("daid", daid_variants()), ("faid", faid_variants())):
        if method in config["methods"]:
            inputs += [
                f"{R}/metrics/mjhq_ablation/{method}/{v}/fid.json" for v in variants
            ]
    return inputs


def tables_output(name):
    """An output of `arrag tables`, flagged for the report when it is a table, a figure or the provenance."""
    path = f"{R}/tables/{name}"
    if name in TABLE_TITLES:
        return report(
            path,
            caption="../report/table.rst",
            category="Tables",
            labels={"table": TABLE_TITLES[name]},
        )
    if name.endswith(".png"):
        ablation = {
            "figure7_daid.png": "DAiD (lambda x tau)",
            "figure7_faid.png": "FAiD (hops x m)",
        }[name]
        return report(
            path,
            caption="../report/figure7.rst",
            category="Figure 7",
            labels={"ablation": ablation},
        )
    if name == "provenance.csv":
        return report(
            path,
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"file": name},
        )
    return path
