"""The pieces between the engine thread and a response: ``Output`` (the per-request queue that
pauses the engine when its reader falls behind) and ``Handoff`` (tokens from the engine thread
to the event loop, one wakeup per burst)."""

from __future__ import annotations

import asyncio

from app.core.output import Failed, Output
from app.engine import Flow
from app.engine.handoff import Handoff


def test_output_pauses_the_engine_when_full_and_hands_over_everything_waiting() -> None:
    """Full at ``capacity`` unread items: the flow pauses. The reader then takes every item
    waiting at once (one send for a response that fell behind), and the flow resumes."""

    async def scenario() -> None:
        flow = Flow()
        woken: list[bool] = []
        flow.on_resume(lambda: woken.append(True))
        output: Output[int] = Output(4, flow)
        for item in range(3):
            output.put(item)
        assert not flow.paused
        output.put(3)
        assert flow.paused
        assert await output.get() == [0, 1, 2, 3]
        assert not flow.paused and woken == [True]
        output.put(4)
        output.fail(ValueError("x"))
        assert output.closed
        batch = await output.get()
        assert batch[0] == 4 and isinstance(batch[1], Failed)

    asyncio.run(scenario())


def test_the_handoff_delivers_in_order_with_one_wakeup_per_burst() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        bursts: list[list[int]] = []
        handoff: Handoff[int] = Handoff(loop, bursts.append)

        def engine() -> None:
            for start in range(0, 30, 3):
                handoff.post(range(start, start + 3))
            handoff.wait_for_room(0, timeout=10)

        await asyncio.to_thread(engine)
        assert [item for burst in bursts for item in burst] == list(range(30))
        assert handoff.backlog() == 0

    asyncio.run(scenario())
