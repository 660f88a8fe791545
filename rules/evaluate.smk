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

    # A sweep's runs share the base model's evaluation: one job makes its cache entry, before the runs' evaluations.
    if RUNS and CFG.evaluate.compare_base:

        rule evaluate_base:
            """lm-evaluation-harness's tasks on the base model, once for all the runs of a sweep, into the cache
            (unless an experiment made the entry already)."""
            input:
                base=model_input(),
            output:
                results=get_base_evaluation_results(),
            log:
                str(SWEEP.log("evaluate_base")),
            params:
                evaluate=get_evaluate_params(),
                base=get_base_evaluation_params(),
                trust_remote_code=CFG.trust_remote_code,
                fingerprint=get_evaluate_fingerprint(),
            script:
                "../workflow_scripts/evaluate_base.py"
