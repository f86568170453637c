-- A spherelab store written by schema version 1 (sqlite3 iterdump of a file made by that code):
-- a sweep of two runs, one queued, one finished with metrics (inf, nan), events and a status history.
BEGIN TRANSACTION;
CREATE TABLE commands (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	payload TEXT DEFAULT '{}' NOT NULL, 
	created_at FLOAT NOT NULL, 
	consumed_at FLOAT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	payload TEXT DEFAULT '{}' NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);
INSERT INTO "events" VALUES(1,2,0,'status','{"status": "running"}',1.79599875309386038772e+09);
INSERT INTO "events" VALUES(2,2,10,'note','{"text": "written by schema version 1"}',1.79599875310305809976e+09);
INSERT INTO "events" VALUES(3,2,0,'status','{"status": "finished"}',1.79599875310941433908e+09);
CREATE TABLE meta (
	"key" VARCHAR(64) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "meta" VALUES('schema_version','1');
CREATE TABLE metrics (
	run_id INTEGER NOT NULL, 
	"key" VARCHAR(128) NOT NULL, 
	step INTEGER NOT NULL, 
	epoch FLOAT NOT NULL, 
	wall_time FLOAT NOT NULL, 
	value FLOAT, 
	special SMALLINT DEFAULT '0' NOT NULL, 
	CONSTRAINT pk_metrics PRIMARY KEY (run_id, "key", step), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
)
 WITHOUT ROWID

;
INSERT INTO "metrics" VALUES(2,'elr',10,0.5,1.0,NULL,1);
INSERT INTO "metrics" VALUES(2,'train_loss',0,0.0,0.0,2.3,0);
INSERT INTO "metrics" VALUES(2,'train_loss',10,0.5,1.0,NULL,2);
CREATE TABLE runs (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	uid VARCHAR(32) NOT NULL, 
	name TEXT NOT NULL, 
	config TEXT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	regime VARCHAR(32), 
	created_at FLOAT NOT NULL, 
	started_at FLOAT, 
	finished_at FLOAT, 
	heartbeat_at FLOAT, 
	device TEXT, 
	error TEXT, 
	tags TEXT DEFAULT '[]' NOT NULL, 
	sweep_id INTEGER, 
	worker_id TEXT, 
	step INTEGER DEFAULT '0' NOT NULL, 
	total_steps INTEGER, 
	checkpoint_path TEXT, 
	checkpoint_step INTEGER, 
	UNIQUE (uid), 
	FOREIGN KEY(sweep_id) REFERENCES sweeps (id) ON DELETE SET NULL
);
INSERT INTO "runs" VALUES(1,'a78723d2e5534bfaabdc3d36980af92b','old queued','{"elr": 0.001, "epochs": 2}','queued',NULL,1.79599875307537055015e+09,NULL,NULL,NULL,NULL,NULL,'["kept"]',1,NULL,0,NULL,NULL,NULL);
INSERT INTO "runs" VALUES(2,'22f488a2d79e4c4484dc1f535f9804ab','old finished','{"elr": 0.01, "epochs": 2}','finished',NULL,1.79599875307537055015e+09,1.79599875308554434772e+09,1.79599875310826897619e+09,1.79599875308554434772e+09,NULL,NULL,'[]',1,'w-old',0,NULL,NULL,NULL);
CREATE TABLE sweeps (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	uid VARCHAR(32) NOT NULL, 
	name TEXT NOT NULL, 
	spec TEXT NOT NULL, 
	created_at FLOAT NOT NULL, 
	UNIQUE (uid)
);
INSERT INTO "sweeps" VALUES(1,'a80c70b1885c4e56bfe4047b962604ff','old sweep','{"swept": {"elr": [0.001, 0.01]}}',1.79599875307537055015e+09);
CREATE TABLE workers (
	id VARCHAR(128) NOT NULL, 
	host TEXT NOT NULL, 
	pid INTEGER NOT NULL, 
	device TEXT NOT NULL, 
	max_parallel INTEGER NOT NULL, 
	started_at FLOAT NOT NULL, 
	heartbeat_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_runs_sweep ON runs (sweep_id);
CREATE INDEX ix_runs_status ON runs (status);
CREATE INDEX ix_metrics_run_step ON metrics (run_id, step);
CREATE INDEX ix_events_run_step ON events (run_id, step);
CREATE INDEX ix_commands_pending ON commands (run_id, consumed_at);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('sweeps',1);
INSERT INTO "sqlite_sequence" VALUES('runs',2);
COMMIT;
