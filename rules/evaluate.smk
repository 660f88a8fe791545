# Only with an evaluate section in the config; `all` then asks for rule evaluate's results.
if CFG.evaluate is not None:

    rule evaluate:
        """lm-evaluation-harness's tasks and greedy generations on {output_dir}/hf_model (the merged model of a LoRA
        run), on a GPU when the job has one; with evaluate.compare_base also on the base model, in the same job (after
        training, so never beside it on a machine's GPUs) unless the cache holds that evaluation already.
        """
        input:
            unpack(get_evaluate_inputs),
        output:
            **get_evaluate_outputs(),
        log:
            str(RUN.log("evaluate")),
        params:
            output_dir=get_output_dir,
            evaluate=get_evaluate_params(),
            base=get_base_evaluation_params(),
            trust_remote_code=CFG.trust_remote_code,
            fingerprint=get_evaluate_fingerprint(),
        script:
            "../workflow_scripts/evaluate.py"
