rule build_example:
    """The embedded example's base model: a tokenizer trained on the shipped corpus and a tiny random Llama."""
    input:
        corpus=ancient(EXAMPLE_CORPUS),
    output:
        model=directory(EXAMPLE_MODEL),
    log:
        "resources/logs/build_example.log",
    params:
        sizes=EXAMPLE_SIZES,
        fingerprint=fingerprint("build_example.py", data={"corpus": EXAMPLE_CORPUS}),
    script:
        "../workflow_scripts/build_example.py"
