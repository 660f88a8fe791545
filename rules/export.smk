rule consolidate:
    """The final sharded checkpoint into safetensors shards with Hugging Face names and an index, in one process."""
    input:
        summary=rules.train.output.summary,
        model=model_input(),
    output:
        weights=directory(str(RUN.consolidated)),
    log:
        str(RUN.log("consolidate")),
    params:
        export=get_consolidate_params,
        trust_remote_code=CFG.trust_remote_code,
        # It writes the base checkpoint's own layout: it reads the names and shapes in the weights' files.
        fingerprint=fingerprint("consolidate.py", model=["files", "weights"]),
    script:
        "../workflow_scripts/consolidate.py"


rule convert_hf:
    """A Hugging Face model directory that AutoModelForCausalLM.from_pretrained loads."""
    input:
        weights=rules.consolidate.output.weights,
        model=model_input(),
    output:
        # With lora.enabled, also the adapter alone (hf_adapter); hf_model is then the merged model.
        **get_convert_outputs(),
    log:
        str(RUN.log("convert_hf")),
    params:
        export=get_convert_params,
        trust_remote_code=CFG.trust_remote_code,
        # The merge of a LoRA adapter reads the base weights; a full fine-tune's export copies consolidate's.
        fingerprint=fingerprint(
            "convert_hf.py",
            model=["files", "weights"] if CFG.lora.enabled else ["files"],
        ),
    script:
        "../workflow_scripts/convert_hf.py"
