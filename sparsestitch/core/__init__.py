"""What every layer uses: errors, dtypes, sizes, options, atomic outputs, the input
and output guard, the C loops, progress, name patterns and the tie order.
"""
