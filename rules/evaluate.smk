# Only with an evaluate section in the config; `all` then asks for rule evaluate's results.
if CFG.evaluate is not None:

    rule evaluate_base:
        """The base model (config key model) evaluated as the trained one is, for evaluate.compare_base."""
        input:
            model=model_input(),
            # Only an order, never a reason to rerun (ancient): on a machine whose GPUs train uses, the base model is
            # loaded once training is done. A path of its own: ancient(rules.train.output.summary) would flag that
            # very object, and so every rule's input that reads it, ancient (consolidate would then never rerun).
            after_train=ancient(out("train/summary.json")),
        output:
            **evaluate_outputs("evaluate/base"),
        log:
            out("logs/evaluate_base.log"),
        params:
            evaluate=get_evaluate_params(),
            # The template training used, which the exported model's tokenizer holds: both are prompted alike.
            chat_template=(
                CFG.data.chat_template if CFG.evaluate.apply_chat_template else None
            ),
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
