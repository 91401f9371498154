module kvroute.dev/kvroute

go 1.22
