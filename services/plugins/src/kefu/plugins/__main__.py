import asyncio

from kefu.plugins.app import PluginsService
from kefu.shared.service import run_service

if __name__ == "__main__":
    asyncio.run(run_service(PluginsService()))
