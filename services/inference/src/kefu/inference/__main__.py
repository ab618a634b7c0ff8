import asyncio

from kefu.inference.app import InferenceService
from kefu.shared.service import run_service

if __name__ == "__main__":
    asyncio.run(run_service(InferenceService()))
