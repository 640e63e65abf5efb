-- Runs once, on the first start of the postgres volume: the state store's database beside Dagster's.
CREATE DATABASE nilus_state;
