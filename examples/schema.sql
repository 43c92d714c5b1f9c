-- A Django-admin style configuration schema: five tables that business rules
-- merge into what the servers read from memcached.
-- Load with: mariadb appdb < examples/schema.sql

CREATE TABLE IF NOT EXISTS application (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(128) NOT NULL,
  description TEXT NOT NULL,
  status INT NOT NULL DEFAULT 1,            -- 1 = active, 0 = disabled
  mtime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
  ctime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  UNIQUE KEY uniq_name (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS environment (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(64) NOT NULL,
  region VARCHAR(32) NOT NULL,
  mtime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
  ctime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS feature (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  code VARCHAR(64) NOT NULL,
  rollout DECIMAL(5,2) NOT NULL DEFAULT 100.00,   -- percent of traffic
  mtime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
  ctime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS app_feature (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  app_id INT NOT NULL,
  feature_id INT NOT NULL,
  mtime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
  ctime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  UNIQUE KEY uniq_app_feature (app_id, feature_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS app_env (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  app_id INT NOT NULL,
  env_id INT NOT NULL,
  replicas INT NOT NULL DEFAULT 1,
  mtime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
  ctime DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  UNIQUE KEY uniq_app_env (app_id, env_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

INSERT INTO application (id, name, description, status) VALUES
  (1, 'test0', 'The application from the original story', 1),
  (2, 'billing', 'Invoices and payments', 1),
  (3, 'legacy', 'Switched off, must not be served', 0);

INSERT INTO environment (id, name, region) VALUES
  (1, 'prod', 'eu-west'), (2, 'staging', 'eu-west'), (3, 'prod-us', 'us-east');

INSERT INTO feature (id, code, rollout) VALUES
  (1, 'dark_mode', 100.00), (2, 'new_checkout', 12.50), (3, 'beta_search', 0.00);

INSERT INTO app_feature (app_id, feature_id) VALUES (1, 1), (1, 2), (2, 2), (2, 3), (3, 1);

INSERT INTO app_env (app_id, env_id, replicas) VALUES (1, 1, 3), (1, 2, 1), (2, 1, 2), (2, 3, 2);
