-- Runs once, when the pgdata volume is first created. MLflow's tracking store is the image's POSTGRES_DB
-- (`mlflow`); Optuna (and the stage leases) and MLflow's user store each get a database of their own.
CREATE DATABASE optuna;
CREATE DATABASE mlflow_auth;
