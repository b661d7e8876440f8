"""Everything that talks to AWS itself: the IMDSv2 client; boto3 client creation in one place."""
