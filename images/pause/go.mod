module gco-infra.local/pause

go 1.26
