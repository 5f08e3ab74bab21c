"""The baseline of bench/bench_api.py: a bare FastAPI + SQLAlchemy app that reads the same job row
as `GET /v1/jobs/{id}` (no auth, no envelope, no logging), on the same pool size and thread count.

    python bench/bare_api.py --port 8101 --database-url postgresql+psycopg://…
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException
from sqlalchemy import create_engine, text


def make_app(database_url: str, pool: int) -> FastAPI:
    engine = create_engine(database_url, pool_pre_ping=True, pool_size=pool // 2, max_overflow=pool - pool // 2)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = pool
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        with engine.connect() as conn:
            row = (
                conn.execute(
                    text("SELECT id, status, stage, progress, spec, created_at FROM jobs WHERE id = :id"),
                    {"id": job_id},
                )
                .mappings()
                .first()
            )
        if row is None:
            raise HTTPException(404)
        return dict(row)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--pool", type=int, default=40)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.database_url, args.pool), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
