"""Admin actions through the gateway land in the audit chain (stream AUDIT) with who did them, and the
chain verifies; only the admin token may read or rotate."""

import aiohttp
import pytest

pytestmark = pytest.mark.integration


async def test_admin_actions_are_recorded_with_their_actor(stack, unique):
    tenant = unique("audited")
    admin = {"Authorization": f"Bearer {stack.admin}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def call(method, path, body=None, headers=admin):
            async with s.request(method, stack.http + path, json=body, headers=headers) as r:
                return r.status, await r.json()

        assert (await call("PUT", f"/v1/tenants/{tenant}/documents/faq", {"title": "FAQ", "text": "退货 30 天内"}))[0] == 200
        assert (await call("DELETE", f"/v1/tenants/{tenant}/documents/faq"))[0] == 200
        assert (await call("PUT", f"/v1/tenants/{tenant}/agents/boss", {"password": "boss-password",
                                                                          "role": "admin"}))[0] == 200
        st, login = await call("POST", "/v1/agent/login", {"tenant": tenant, "agent_id": "boss",
                                                           "password": "boss-password"}, headers={})
        assert st == 200
        boss = {"Authorization": f"Bearer {login['agent_token']}"}
        st, _ = await call("PUT", f"/v1/tenants/{tenant}/plugins/crm_adapter",
                           {"enabled": True, "settings": {"base_url": "http://crm.internal/api", "api_key": "s3cret"}},
                           headers=boss)
        assert st == 200
        assert (await call("DELETE", f"/v1/tenants/{tenant}/agents/boss"))[0] == 200

        st, listed = await call("GET", f"/v1/audit?tenant={tenant}&limit=50")
        assert st == 200
        got = [(r["action"], r["actor"], r["target"]) for r in listed["records"]]
        assert got == [("document.upsert", "admin", "faq"), ("document.delete", "admin", "faq"),
                       ("agent.put", "admin", "boss"), ("plugin.configure", f"agent:{tenant}.boss", "crm_adapter"),
                       ("agent.delete", "admin", "boss")]
        configured = listed["records"][3]["details"]
        assert configured["settings"] == "api_key,base_url" and "s3cret" not in str(listed)
        assert listed["records"][0]["details"]["version"].isdigit()

        st, verified = await call("GET", "/v1/audit/verify")
        assert st == 200 and verified["ok"] and verified["records"] >= 5 and verified["problem"] is None

        st, keys = await call("GET", "/v1/keys")
        assert st == 200 and keys["enabled"] and keys["suite"] == "aes" and len(keys["master_key_id"]) == 16

        # Not for visitors, agents or anyone without the admin token.
        for headers in ({}, boss, {"Authorization": "Bearer nope"}):
            for method, path in (("GET", "/v1/audit"), ("GET", "/v1/audit/verify"), ("GET", "/v1/keys"),
                                 ("POST", "/v1/keys/rotate")):
                st, body = await call(method, path, {} if method == "POST" else None, headers=headers)
                assert st in (401, 403) and body["error"]["code"], (method, path, st)
        st, body = await call("GET", "/v1/audit?limit=0")
        assert st == 400 and body["error"]["code"] == "invalid_field"
        st, body = await call("POST", "/v1/keys/rotate", {"data_keys": "yes"})
        assert st == 400 and body["error"]["code"] == "invalid_field"
