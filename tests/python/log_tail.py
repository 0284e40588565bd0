"""Showing the tail of a background process's log when a test failed."""


def show_tail(request, heading: str, text: str, lines: int) -> None:
    """Prints the last `lines` of `text` under `heading`, past pytest's
    output capture, so it reaches the run's output even from a fixture's
    teardown."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n--- {heading}, last {lines} lines ---")
        print("\n".join(text.splitlines()[-lines:]))
