"""meshware.identity"""
