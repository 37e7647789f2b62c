"""The terminal progress bar: it counts steps as they are queued and draws them; off without
a terminal."""

import io

from rich.console import Console

from flows.progress import ProgressBar


def test_bar_advances_step_by_step_and_shows_the_note() -> None:
    """Each advance counts one step and a refresh draws the count so far (3/5 before the end,
    5/5 at it), with the note beside it; a resumed epoch starts from its done steps."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with ProgressBar("epoch 1/2", 5, console=console) as bar:
        for _ in range(3):
            bar.advance()
        bar.note("loss 0.1234")
        bar._progress.refresh()
        assert bar.completed == 3 and "3/5" in out.getvalue() and "loss 0.1234" in out.getvalue()
        bar.advance()
        bar.advance()
    assert "5/5" in out.getvalue()
    assert ProgressBar("epoch 2/2", 5, done=2, console=console).completed == 2


def test_no_bar_without_a_terminal(capsys) -> None:
    """Under pytest stderr is not a terminal: nothing is drawn and advancing costs nothing."""
    with ProgressBar("epoch 1/1", 4) as bar:
        bar.advance()
        bar.note("loss 1")
    assert bar.completed == 0 and capsys.readouterr().err == ""
