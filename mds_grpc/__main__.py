from mds_grpc.cli import main

main()
