"""pass@k (the unbiased estimator of Chen et al., 2021) as a Hugging Face ``evaluate`` metric.

Load by local path (works offline)::

    import evaluate
    from merge_distill.evaluation.metrics import hf_metric_path

    pass_k = evaluate.load(hf_metric_path("pass_at_k"))
    pass_k.compute(predictions=[[1, 0, 0, 0, 1]], k=2)
    # {'pass_at_k': 0.7, 'stderr': 0.0, 'n_problems': 1, 'k': 2}

Each prediction is one problem's list of per-sample correctness values (0/1); n is its
length and c the number of samples >= 0.5. The statistics come from
``merge_distill.evaluation.metrics``.
"""

import datasets
import evaluate

from merge_distill.evaluation.metrics import suite_score

_DESCRIPTION = "pass@k: mean over problems of 1 - C(n-c, k)/C(n, k), with its standard error over problems."

_KWARGS_DESCRIPTION = """
Args:
    predictions: one list per problem of per-sample correctness values in [0, 1].
    k: samples drawn per problem (default 1); must not exceed any problem's sample count.
Returns:
    pass_at_k: the score in [0, 1]; stderr: its standard error over problems (ddof=1);
    n_problems: the number of problems; k: the k used.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions, k=1):
        score = suite_score(predictions, "pass", k)
        return {"pass_at_k": score.score, "stderr": score.stderr, "n_problems": score.n_problems, "k": k}
