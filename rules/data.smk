rule tokenize:
    """One source's documents to token ids with the model's tokenizer (a job per source of data.train), plus a held-out
    eval split when data.eval is null; into the cache, where experiments with the same settings share it.
    """
    input:
        unpack(get_source_files),
        model=model_input(),
    output:
        tokenized=directory(cached("tokenized/{key}")),
    log:
        cached("logs/tokenize-{key}.log"),
    wildcard_constraints:
        key="|".join(SOURCE_KEYS.values()),
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
        tokenized=expand(rules.tokenize.output.tokenized, key=SOURCE_KEYS.values()),
    output:
        packed=directory(cached(f"packed/{PACK_KEY}")),
    log:
        cached(f"logs/pack-{PACK_KEY}.log"),
    params:
        max_seq_len=CFG.max_seq_len,
        data=get_pack_params(),
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
        tokenized=directory(out("tokenized")),
        packed=directory(out("packed")),
    log:
        out("logs/link_data.log"),
    localrule: True
    params:
        sources=list(SOURCE_KEYS),
        fingerprint=fingerprint("link_data.py"),
    script:
        "../workflow_scripts/link_data.py"
