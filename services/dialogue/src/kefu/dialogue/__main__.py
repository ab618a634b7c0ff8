import asyncio

from kefu.dialogue.app import DialogueService
from kefu.shared.service import run_service

if __name__ == "__main__":
    asyncio.run(run_service(DialogueService()))
