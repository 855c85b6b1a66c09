"""Drop users.role: the role now follows the APP_ADMIN setting.

A role stored at signup stayed with the account when it moved to another
address, and did not follow a change of APP_ADMIN. `User.role` now compares the
account's address with the setting instead.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("role")


def downgrade() -> None:
    # Every account comes back as a plain user: the old code granted the role
    # at signup only, and the setting is not known here.
    with op.batch_alter_table("users") as batch_op:
        batch_op.add_column(
            sa.Column(
                "role", sa.String(length=32), nullable=False, server_default="User"
            )
        )
