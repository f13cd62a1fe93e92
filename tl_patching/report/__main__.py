from tl_patching.report.page import main

main()
