"""Binlog CDC from MariaDB: server checks, the snapshot handover, the binlog reader and the apply
(the same change collapsing, sink apply and result as PostgreSQL CDC; see README "Binlog CDC")."""
