"""avg@k as a Hugging Face ``evaluate`` metric.

Load by local path (works offline)::

    import evaluate
    from merge_distill.evaluation.metrics import hf_metric_path

    avg = evaluate.load(hf_metric_path("avg_at_k"))
    avg.compute(predictions=[[1, 0, 1, 1], [0, 0, 1, 0]])
    # {'avg_at_k': 0.5, 'stderr': 0.25, 'n_problems': 2, 'k': 4}

Each prediction is one problem's list of per-sample correctness values (0/1).
The statistics come from ``merge_distill.evaluation.metrics``.
"""

import datasets
import evaluate

from merge_distill.evaluation.metrics import suite_score

_DESCRIPTION = "avg@k: mean over problems of each problem's mean correctness over its k samples, with its standard error over problems."

_KWARGS_DESCRIPTION = """
Args:
    predictions: one list per problem of per-sample correctness values in [0, 1].
    k: optional; use only the first k samples of each problem (default: all).
Returns:
    avg_at_k: the score in [0, 1]; stderr: its standard error over problems (ddof=1);
    n_problems: the number of problems; k: samples per problem used.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AvgAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions, k=None):
        score = suite_score(predictions, "avg", k)
        return {
            "avg_at_k": score.score,
            "stderr": score.stderr,
            "n_problems": score.n_problems,
            "k": k if k is not None else score.n_samples,
        }
