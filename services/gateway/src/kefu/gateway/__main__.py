import asyncio

from kefu.gateway.app import GatewayService
from kefu.shared.service import run_service

if __name__ == "__main__":
    asyncio.run(run_service(GatewayService()))
