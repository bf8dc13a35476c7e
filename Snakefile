# AR-RAG harness: one DAG from images to the paper's tables, at two scales.
#   snakemake --cores all --use-conda                         paper scale (config/config.yaml)
#   snakemake --cores 2 --configfile config/demo.yaml         the Shapes world (what `make demo` runs)
# A --configfile replaces config/config.yaml (it is not merged into it).
from snakemake.utils import min_version

min_version("9.0")


if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/showo.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


rule all:
    """The whole pipeline: the tables, every result record they are made from, and the checks."""
    input:
        all_targets(),
