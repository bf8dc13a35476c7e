# Report: Tables 1-4 and Figure 7 rendered from result records only.


rule tables:
    """Tables 1-4 and Figure 7 beside the paper's reported numbers (Markdown, LaTeX, CSV, PNG)."""
    input:
        table_inputs(),
    output:
        f"{R}/tables/README.md",
    conda:
        MAIN_ENV
    log:
        f"{LOGS}/tables.log",
    shell:
        "python -m arrag.cli tables --out {output:q} {input:q} > {log:q} 2>&1"
