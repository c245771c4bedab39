from merge_distill.cli import app

app(prog_name="merge-distill")
