"""``chinwag adapters …``: trained adapter versions — list, inspect, promote, roll back."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

adapters_app = typer.Typer(help="Trained adapter versions: list, inspect, promote, roll back.")


def _registry() -> Any:
    from bot.cli import settings
    from bot.models.registry import AdapterRegistry

    s = settings(default_level="WARNING")
    return AdapterRegistry(s.models.registry_dir or AdapterRegistry.for_data_dir(s.data_dir).root)


def _registry_call(fn: Callable[[], Any]) -> Any:
    from bot.cli import fail
    from bot.models.registry import RegistryError

    try:
        return fn()
    except RegistryError as exc:
        raise fail(str(exc), 1) from None


@adapters_app.command("list")
def adapters_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every adapter, its versions, and which one is in service."""
    registry = _registry()
    rows = []
    for name in registry.names():
        current = registry.current(name)
        for v in registry.versions(name):
            rows.append(
                {
                    "adapter": name,
                    "version": v.version,
                    "in_service": bool(current and current.version == v.version),
                    "kind": v.kind,
                    "created": v.meta.get("created"),
                    "metrics": v.meta.get("metrics", {}),
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no adapters yet")
    for r in rows:
        mark = "*" if r["in_service"] else " "
        figures = ", ".join(
            f"{k} {v:.4f}" for k, v in r["metrics"].items() if isinstance(v, int | float)
        )
        typer.echo(f"{mark} {r['adapter']:<12} {r['version']:<5} {r['created'] or ''}  {figures}")
    if rows:
        typer.echo("* in service")


@adapters_app.command("show")
def adapters_show(name: str, version: Annotated[str | None, typer.Argument()] = None) -> None:
    """One version's metadata (the one in service by default) and the adapter's history."""
    registry = _registry()

    def show() -> dict[str, Any]:
        entry = registry.get(name, version) if version else registry.current(name)
        if entry is None:
            from bot.models.registry import RegistryError

            raise RegistryError(f"adapter {name!r} has no version in service")
        return {
            "path": str(entry.path),
            "meta": entry.meta,
            "history": registry.history(name),
        }

    typer.echo(json.dumps(_registry_call(show), indent=2, default=str))


@adapters_app.command("promote")
def adapters_promote(name: str, version: str) -> None:
    """Put VERSION in service; a running bot swaps to it within seconds."""
    entry = _registry_call(lambda: _registry().promote(name, version, reason="by hand"))
    typer.echo(f"{name} {entry.version} is in service")


@adapters_app.command("rollback")
def adapters_rollback(name: str) -> None:
    """Put the version that was in service before the current one back."""
    entry = _registry_call(lambda: _registry().rollback(name))
    typer.echo(f"{name} rolled back to {entry.version}")
