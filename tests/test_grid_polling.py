"""The server checks a simulation's grid for replies every few milliseconds, not Flower's
default 100 ms, which added up to that to each of split training's exchanges."""

from __future__ import annotations

from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.superlink.grid import InMemoryGrid

from server.app import GRID_PULL_INTERVAL_S, poll_replies_often


def _simulation_grid() -> InMemoryGrid:
    """The grid a Flower simulation hands its ServerApp (flwr.simulation.run_simulation)."""
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    return InMemoryGrid(state_factory=factory)


def test_a_simulation_grid_is_polled_often():
    grid = _simulation_grid()
    assert grid.pull_interval == 0.1  # Flower's default: the reason for the setting
    poll_replies_often(grid)
    assert grid.pull_interval == GRID_PULL_INTERVAL_S < 0.01


def test_a_deployments_grid_is_left_alone():
    from flwr.superlink.grid.http_grid import HttpGrid  # what a deployed ServerApp gets

    grid = HttpGrid("127.0.0.1:9093", insecure=True, token="run-token")
    poll_replies_often(grid)
    assert not hasattr(grid, "pull_interval")
