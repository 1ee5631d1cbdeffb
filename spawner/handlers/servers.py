"""``GET /hub/api/servers`` (scope ``custom:servers:list``): every running server as
``"{user_id}_{server_name}_{start_id}"``, the upstream format Outposts use to find orphans."""

from __future__ import annotations

import json

from jupyterhub import orm
from jupyterhub.apihandlers.base import APIHandler

from jupyterhub_outpost_mq.spawner.handlers.access import require_scope


class ListServersHandler(APIHandler):
    async def get(self) -> None:
        require_scope(self, "custom:servers:list")
        running = (
            self.db.query(orm.Spawner).filter(orm.Spawner.server_id.isnot(None)).order_by(orm.Spawner.user_id.asc())
        )
        names = []
        for row in running:
            spawner = self.users[row.user].spawners[row.name]
            names.append(f"{row.user_id}_{row.name}_{getattr(spawner, 'start_id', '')}")
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(names))


default_handlers = [(r"/api/servers", ListServersHandler)]
