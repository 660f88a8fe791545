rule tokenize:
    """One source's documents to token ids with the model's tokenizer (a job per source of data.train), plus a held-out
    eval split when data.eval is null; into the cache, where experiments with the same settings share it.
    """
    input:
        unpack(get_source_files),
        model=model_input(),
    output:
        tokenized=directory(str(CACHE.tokenized("{key}"))),
    log:
        str(CACHE.log("tokenize", "{key}")),
    wildcard_constraints:
        key="|".join(DATA.keys.values()),
    params:
        source=get_source_params,
        trust_remote_code=CFG.trust_remote_code,
        fingerprint=get_source_fingerprint,
    script:
        "../workflow_scripts/tokenize.py"


rule pack:
    """Tokenized documents into rows of at most max_seq_len tokens, positions restarting per document; the sources of
    a mixture sampled by their weights. Into the cache."""
    input:
        tokenized=expand(rules.tokenize.output.tokenized, key=DATA.keys.values()),
    output:
        packed=directory(str(CACHE.packed(DATA.pack_key))),
    log:
        str(CACHE.log("pack", DATA.pack_key)),
    params:
        max_seq_len=CFG.max_seq_len,
        data=DATA.pack_settings(),
        fingerprint=fingerprint("pack.py"),
    script:
        "../workflow_scripts/pack.py"


rule link_data:
    """This experiment's view of its data in the cache: {output_dir}/tokenized/<source> and the files of
    {output_dir}/packed are links to the cache's entries, and so are the logs of tokenize and pack.
    """
    input:
        tokenized=rules.pack.input.tokenized,
        packed=rules.pack.output.packed,
    output:
        tokenized=directory(str(RUN.tokenized)),
        packed=directory(str(RUN.packed)),
    log:
        str(RUN.log("link_data")),
    localrule: True
    params:
        output_dir=get_output_dir,
        sources=DATA.keys,
        pack_key=DATA.pack_key,
        fingerprint=fingerprint("link_data.py"),
    script:
        "../workflow_scripts/link_data.py"
