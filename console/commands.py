"""The command palette (ctrl+p) and the help screen, both built from the active key bindings.

There is one key list: the ``BINDINGS`` of the app and its screens. The
palette offers every binding that is active (and allowed: ``--readonly``
removes the actions) on the screen it was opened from, so the footer, ``?``
and ``ctrl+p`` can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.dom import DOMNode
from textual.screen import Screen


@dataclass(frozen=True)
class KeyAction:
    """One bound key as the help screen and the palette show it."""

    key: str
    description: str
    action: str
    node: DOMNode
    enabled: bool


def key_actions(screen: Screen[object]) -> list[KeyAction]:
    """The shown bindings active on ``screen`` (deduplicated by action, in binding order)."""
    out: list[KeyAction] = []
    seen: set[tuple[str, str]] = set()
    for key, ab in screen.active_bindings.items():
        b = ab.binding
        if not b.show or not b.description:
            continue
        ident = (b.action, b.description)
        if ident in seen:
            continue
        seen.add(ident)
        display = screen.app.get_key_display(b) if b.key_display is None else b.key_display
        out.append(KeyAction(display or key, b.description, b.action, ab.node, ab.enabled))
    return out


class BindingCommands(Provider):
    """Palette commands: the active key bindings of the screen the palette was opened on."""

    def _actions(self) -> list[KeyAction]:
        return [k for k in key_actions(self.screen) if k.enabled]

    def _run(self, k: KeyAction) -> None:
        self.app.call_later(self.app.run_action, k.action, k.node)

    async def discover(self) -> Hits:
        """Every command, before anything is typed."""
        for k in self._actions():
            yield DiscoveryHit(k.description, partial(self._run, k), help=f"key: {k.key}")

    async def search(self, query: str) -> Hits:
        """Commands whose description matches ``query``."""
        matcher = self.matcher(query)
        for k in self._actions():
            score = matcher.match(k.description)
            if score > 0:
                yield Hit(
                    score, matcher.highlight(k.description), partial(self._run, k), help=f"key: {k.key}"
                )
