"""A data migration: every price doubles. Cached products must not keep the old price.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE alembic_demo_product SET price_cents = price_cents * 2")


def downgrade() -> None:
    op.execute("UPDATE alembic_demo_product SET price_cents = price_cents / 2")
