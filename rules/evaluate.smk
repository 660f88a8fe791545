# Only with an evaluate section in the config; `all` then asks for rule evaluate's results.
if CFG.evaluate is not None:

    rule evaluate_base:
        """The base model (config key model) evaluated as the trained one is, for evaluate.compare_base."""
        input:
            model=model_input(),
        output:
            **evaluate_outputs("evaluate/base"),
        log:
            out("logs/evaluate_base.log"),
        params:
            evaluate=get_evaluate_params(),
            trust_remote_code=CFG.trust_remote_code,
            fingerprint=fingerprint(
                "evaluate.py", data=get_task_files(), model=["files", "weights"]
            ),
        script:
            "../workflow_scripts/evaluate.py"

    rule evaluate:
        """lm-evaluation-harness's tasks and greedy generations on {output_dir}/hf_model (the merged model of a LoRA
        run), on a GPU when the job has one; compared with the base model with evaluate.compare_base.
        """
        input:
            **get_evaluate_inputs(),
        output:
            **evaluate_outputs("evaluate", report_category="evaluate"),
        log:
            out("logs/evaluate.log"),
        params:
            evaluate=get_evaluate_params(),
            trust_remote_code=CFG.trust_remote_code,
            fingerprint=fingerprint("evaluate.py", data=get_task_files()),
        script:
            "../workflow_scripts/evaluate.py"
