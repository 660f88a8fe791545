rule tokenize:
    """One source's documents to token ids with the model's tokenizer (a job per source of data.train), plus a held-out
    eval split when data.eval is null."""
    input:
        unpack(get_source_files),
        model=model_input(),
    output:
        tokenized=directory(out("tokenized/{source}")),
    log:
        out("logs/tokenize/{source}.log"),
    wildcard_constraints:
        source="|".join(re.escape(name) for name in SOURCES),
    params:
        source=get_source_params,
        trust_remote_code=CFG.trust_remote_code,
        fingerprint=get_source_fingerprint,
    script:
        "../workflow_scripts/tokenize.py"


rule pack:
    """Tokenized documents into rows of at most max_seq_len tokens, positions restarting per document; the sources of
    a mixture sampled by their weights."""
    input:
        tokenized=expand(rules.tokenize.output.tokenized, source=SOURCES),
    output:
        packed=directory(out("packed")),
    log:
        out("logs/pack.log"),
    params:
        max_seq_len=CFG.max_seq_len,
        data=get_pack_params(),
        fingerprint=fingerprint("pack.py"),
    script:
        "../workflow_scripts/pack.py"
