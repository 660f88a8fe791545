rule tokenize:
    """Documents to token ids with the model's tokenizer, plus a held-out eval split when data.eval is null."""
    input:
        unpack(get_data_files),
        model=model_input(),
    output:
        tokenized=directory(out("tokenized")),
    log:
        out("logs/tokenize.log"),
    params:
        data=get_data_params(),
        trust_remote_code=CFG.trust_remote_code,
        fingerprint=fingerprint("tokenize.py", data=data_paths(), model=["files"]),
    script:
        "../workflow_scripts/tokenize.py"


rule pack:
    """Tokenized documents into rows of at most max_seq_len tokens, positions restarting per document."""
    input:
        tokenized=rules.tokenize.output.tokenized,
    output:
        packed=directory(out("packed")),
    log:
        out("logs/pack.log"),
    params:
        max_seq_len=CFG.max_seq_len,
        packing=CFG.data.packing,
        chunk_overlap=CFG.data.chunk_overlap,
        fingerprint=fingerprint("pack.py"),
    script:
        "../workflow_scripts/pack.py"
