# Report: Tables 1-4 and Figure 7 rendered from result records only, beside the paper's reported numbers.
# `snakemake --report report.html` collects the flagged outputs (common.smk: tables_output): the tables (CSV),
# Figure 7 (PNG), the provenance of every number, and a sample grid per (benchmark, method, variant) from
# gather_generation.


rule tables:
    """Tables 1-4 and Figure 7 beside the paper's reported numbers (Markdown, LaTeX, CSV, PNG)."""
    input:
        records=report_inputs(),
        reported=expand(
            f"{REPORTED}/{{name}}.csv",
            name=[t.name for t in TABLES] + ["figure7_ablation"],
        ),
    output:
        f"{R}/tables/README.md",
        *[tables_output(name) for name in TABLE_OUTPUTS],
    log:
        f"{LOGS}/tables.log",
    localrule: True
    conda:
        MAIN_ENV
    params:
        code=code_hash("tables"),
        run_dir=lambda wildcards, output: os.path.dirname(os.path.dirname(output[0])),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        reported=lambda wildcards, input: os.path.dirname(input.reported[0]),
        scale=config["scale"],
        methods=[
            f"--method={m}={main_variant(m)}"
            for m in config["methods"] + config["showo"]["methods"]
        ],
        lam=config["daid"]["grid"]["lam"],
        tau=config["daid"]["grid"]["tau"],
        hops=config["faid"]["grid"]["hops"],
        m=config["faid"]["grid"]["m"],
    shell:
        "OMP_NUM_THREADS={threads} python -m arrag.cli tables --run-dir {params.run_dir:q} --out-dir {params.out_dir:q}"
        " --scale {params.scale} {params.methods:q} --daid-lam {params.lam} --daid-tau {params.tau}"
        " --faid-hops {params.hops:q} --faid-m {params.m} --reported {params.reported:q} > {log:q} 2>&1"
