"""``accelerate launch`` that ends with its parent: ``python -m shoe_lora_pipeline.accelerate_launch <args>``.

Its arguments are ``accelerate launch``'s. The launcher (torchrun's agent, in this process) terminates its
training processes when it gets SIGINT or SIGTERM, or when one of them dies; but a SIGKILL of the Dagster
step process that started it would leave it running. So it first asks to be terminated (SIGTERM: the agent
then stops its processes) when its parent ends; the training processes do the same on their side
(``shoe_lora_pipeline.train``).
"""

from __future__ import annotations

import signal
import sys

from shoe_lora_pipeline.core.lifetime import die_with_parent


def main(argv: list[str] | None = None) -> None:
    die_with_parent(signal.SIGTERM)
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
