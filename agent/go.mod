module cocoon/agent

go 1.23
