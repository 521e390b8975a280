"""Small mechanisms every concern uses: errors, atomic files, locks, downloads, devices."""
