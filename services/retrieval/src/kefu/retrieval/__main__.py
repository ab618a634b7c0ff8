import asyncio

from kefu.retrieval.app import RetrievalService
from kefu.shared.service import run_service

if __name__ == "__main__":
    asyncio.run(run_service(RetrievalService()))
